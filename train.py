"""Train a car classifier: `python train.py [group=option ...] [key=value ...]` (see conf/train.yaml)."""

from carnet.training.cli import main

if __name__ == "__main__":
    main()
