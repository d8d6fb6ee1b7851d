"""Every lightning_debug callback configured from YAML through LightningCLI.

python examples/cli.py fit --config examples/config.yaml
"""

from lightning.pytorch.cli import LightningCLI

from lightning_debug.data import DigitsDataModule
from lightning_debug.zoo import DigitsMLP


def main(args: list[str] | None = None) -> None:
    LightningCLI(DigitsMLP, DigitsDataModule, args=args, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
