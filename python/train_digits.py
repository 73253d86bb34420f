"""Train a small ConViT with the fused GPSA on scikit-learn's digits from Python, then use the model.

    python python/train_digits.py                      # the default recipe: a couple of minutes on a CPU
    python python/train_digits.py --epochs 1 --steps-per-epoch 2 --model convit_test --input-size 16

Any option of `convit-kernels train` can be appended; they override the defaults of this example.
"""

import sys

import torch

import convit_kernels
from convit_kernels.train import fit, parse_config
from convit_kernels.train.data import digits


def main(argv) -> None:
    # --overwrite: each run of this example replaces the previous one in its folder.
    config = parse_config(["--output-dir", "convit-digits-example", "--overwrite", "--no-progress", *argv])
    result = fit(config)  # trains, logs to log.jsonl, checkpoints every epoch, plots gpsa.png
    model = result["model"].eval()
    print(f"fused GPSA layers: {sum(isinstance(m, convit_kernels.FusedGPSA) for m in model.modules())}")
    for record in result["records"]:
        gates = {name: round(sum(s["gating"]) / len(s["gating"]), 3) for name, s in record["gpsa"].items()}
        print(f"epoch {record['epoch']}: val acc {record['val_acc1']:.1f}%, mean gate per GPSA layer {gates}")

    # Predict a few validation digits with the trained model.
    val = digits(config.input_size, augment=False).val
    images = torch.stack([val[i][0] for i in range(8)]).to(next(model.parameters()).device)
    with torch.no_grad():
        predicted = model(images).argmax(-1).tolist()
    print(f"predicted {predicted}\ntrue      {[val[i][1] for i in range(8)]}")


if __name__ == "__main__":
    main(sys.argv[1:])
