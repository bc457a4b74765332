from ._collate import (
    collate_for_dataset,
    config_is_packed,
    padded_collate_mistral3,
    padded_collate_packed_mistral3,
    padded_length,
)

__all__ = [
    "collate_for_dataset",
    "config_is_packed",
    "padded_collate_mistral3",
    "padded_collate_packed_mistral3",
    "padded_length",
]
