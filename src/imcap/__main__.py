"""`python -m imcap ...` is the `imcap` command; `torchrun ... -m imcap train RECIPE` trains data-parallel."""

from imcap.cli import main

if __name__ == "__main__":
    main()
