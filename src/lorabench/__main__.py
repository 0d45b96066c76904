"""`python -m lorabench` runs the same Hydra app as the `lorabench` console script."""

from lorabench.cli import main

if __name__ == "__main__":
    main()
