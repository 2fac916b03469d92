"""``python -m dask_merge``: the same as the ``dask-merge`` command."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="dask-merge")
