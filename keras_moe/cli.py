"""The `keras-moe` command line.

`keras-moe info` reports the installation, `keras-moe list` the zoo models; training,
evaluation, export, tuning and benchmarks arrive as further subcommands.
"""

import argparse
import sys


def _info(_args):
    import keras
    import tensorflow as tf

    import keras_moe
    from keras_moe.data import sources

    print(f"keras-moe {keras_moe.__version__}")
    print(f"keras {keras.__version__} (backend {keras.backend.backend()}), "
          f"tensorflow {tf.__version__}")
    devices = ", ".join(d.name for d in tf.config.list_physical_devices()) or "none"
    print(f"devices: {devices}")
    looked = []
    found = sources.find_local("fashion_mnist", looked=looked)
    if found is None:
        print("default data (fashion_mnist): not found; looked in " + ", ".join(looked))
        return 1
    print(f"default data (fashion_mnist): {found.location}")
    return 0


def _list(args):
    from keras_moe import zoo

    names = zoo.list_models(args.pattern)
    if not names:
        print("no zoo models" + (f" matching {args.pattern!r}" if args.pattern else ""))
        return 1
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {zoo.describe(name)}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-moe", description="Mixture-of-experts models for Keras."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command")
    info = commands.add_parser("info", help="versions, devices and where the default data is")
    info.set_defaults(handler=_info)
    listing = commands.add_parser("list", help="zoo models, one line each")
    listing.add_argument("pattern", nargs="?", default=None, help="only names containing this")
    listing.set_defaults(handler=_list)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        import keras_moe

        print(keras_moe.__version__)
        return 0
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
