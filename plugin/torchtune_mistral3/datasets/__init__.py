from ._medpix import (
    MEDPIX_SAMPLE_DIR,
    MEDPIX_SOURCE,
    MedPixDataset,
    MedPixToMessages,
    medpix_dataset,
    medpix_sample_dataset,
    open_image,
    validation_cases,
)
from ._packed import PackedDataset, pack_first_fit

__all__ = [
    "MEDPIX_SAMPLE_DIR",
    "MEDPIX_SOURCE",
    "MedPixDataset",
    "MedPixToMessages",
    "medpix_dataset",
    "medpix_sample_dataset",
    "open_image",
    "pack_first_fit",
    "PackedDataset",
    "validation_cases",
]
