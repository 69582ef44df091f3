"""cyclealign_pl: CycleAlign (white-box / black-box cyclical alignment) on PyTorch Lightning."""

__version__ = "0.1.0"
