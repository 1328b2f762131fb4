"""Export a trained checkpoint's inference network to ONNX and check it against PyTorch.

    reid-export --checkpoint outputs/market1501/checkpoints --out model.onnx \\
        [--image-size 256 128] [--opset N] [--no-verify]

The graph takes `images` [N, 3, H, W] (float32, RGB, ImageNet-normalised: see
pipeline.inference.FeatureExtractor.preprocess) and returns `features` [N, D], L2-normalised; N is
dynamic. After writing, the file is run with ONNX Runtime on a random batch of 3 and compared with
PyTorch (--no-verify skips this). It needs the `export` extra (onnx, onnxscript, onnxruntime):
`pip install 'alignedreid-pipeline[export]'`; without it the command says so and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.logs import setup_logging

VERIFY_ATOL = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reid-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="ckpt-*.pt file, checkpoints directory, run directory, or a logged MLflow "
                             "model (runs:/<run_id>/model, models:/NAME/VERSION)")
    parser.add_argument("--out", required=True, help="ONNX file to write")
    parser.add_argument("--image-size", type=int, nargs=2, metavar=("H", "W"),
                        help="input size (default: the size the checkpoint trained at)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="compare ONNX Runtime with PyTorch after export (default: on)")
    args = parser.parse_args(argv)
    setup_logging()
    if args.image_size and min(args.image_size) <= 0:
        parser.error(f"--image-size {args.image_size}: both sides must be positive")

    import torch

    from pipeline.inference import FeatureExtractor, MissingExtraError, export_onnx, require_export_extra

    try:
        require_export_extra(verify=args.verify)
    except MissingExtraError as exc:
        print(f"export error: {exc}", file=sys.stderr)
        return 2
    try:
        out = export_onnx(args.checkpoint, args.out, image_size=args.image_size, opset=args.opset)
    except (FileNotFoundError, ValueError) as exc:
        print(f"export error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.verify:
        import onnxruntime as ort

        extractor = FeatureExtractor(args.checkpoint, image_size=args.image_size)
        images = torch.rand(3, 3, *extractor.image_size, generator=torch.Generator().manual_seed(0))
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        onnx_feats = session.run(None, {"images": extractor.preprocess(images).numpy()})[0]
        diff = float((torch.from_numpy(onnx_feats) - extractor(images)).abs().max())
        print(f"ONNX Runtime vs PyTorch on 3 images {list(extractor.image_size)}: max |diff| = "
              f"{diff:.2e}")
        if diff > VERIFY_ATOL:
            print(f"export error: ONNX Runtime disagrees with PyTorch by {diff:.2e} "
                  f"(> {VERIFY_ATOL:g})", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
