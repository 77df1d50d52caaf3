"""``python -m captions`` (also what ``torchrun -m captions`` runs)."""

from captions.cli import main

if __name__ == "__main__":
    main()
