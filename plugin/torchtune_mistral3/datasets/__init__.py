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

__all__ = [
    "MEDPIX_SAMPLE_DIR",
    "MEDPIX_SOURCE",
    "MedPixDataset",
    "MedPixToMessages",
    "medpix_dataset",
    "medpix_sample_dataset",
    "open_image",
    "validation_cases",
]
