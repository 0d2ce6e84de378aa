"""The benchmark suite of issue 5: ``python -m bench`` (see ``__main__``)."""
