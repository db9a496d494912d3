"""python -m server.train: fine-tune an adapter on the served model (see server/train/cli.py)."""
from server.train.cli import main

if __name__ == "__main__":
    main()
