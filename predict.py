"""Predict: `python predict.py ckpt=PATH [tta=true] [split=val|oof] [images=DIR]` (conf/predict.yaml)."""

from carnet.inference.cli import main

if __name__ == "__main__":
    main()
