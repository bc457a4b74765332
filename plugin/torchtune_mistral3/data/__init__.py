from ._collate import padded_collate_mistral3

__all__ = ["padded_collate_mistral3"]
