"""Swap the fused GPSA into a timm ConViT and check that it computes the same thing.

python python/swap_in_fused_gpsa.py [--model convit_tiny] [--batch 4] [--img-size 224]
"""

import argparse
import copy

import timm
import torch

import convit_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="convit_tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=224)
    args = parser.parse_args()

    torch.manual_seed(0)
    stock = timm.create_model(args.model, pretrained=False, img_size=args.img_size)
    patched = convit_kernels.patch_convit(copy.deepcopy(stock))
    assert patched.state_dict().keys() == stock.state_dict().keys()
    swapped = sum(isinstance(m, convit_kernels.FusedGPSA) for m in patched.modules())
    print(f"{args.model}: {swapped} GPSA layers now FusedGPSA; state_dict keys unchanged")

    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    outputs = {}
    for name, model in (("stock", stock), ("patched", patched)):
        logits = model(x)
        logits.logsumexp(-1).mean().backward()
        outputs[name] = (logits.detach(), model.head.weight.grad, model.blocks[0].attn.qk.weight.grad)
    (logits_s, head_s, qk_s), (logits_p, head_p, qk_p) = outputs["stock"], outputs["patched"]

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    print(f"logits               max rel. difference {rel(logits_p, logits_s):.2e}")
    print(f"head.weight grad     max rel. difference {rel(head_p, head_s):.2e}")
    print(f"blocks.0 qk grad     max rel. difference {rel(qk_p, qk_s):.2e}")
    if max(rel(logits_p, logits_s), rel(head_p, head_s), rel(qk_p, qk_s)) > 1e-3:
        raise SystemExit("the patched model disagrees with the stock one")
    print("patched model agrees with the stock one")


if __name__ == "__main__":
    main()
