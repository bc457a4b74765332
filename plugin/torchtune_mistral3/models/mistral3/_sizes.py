"""The family's named sizes: a model builder for each, and the Hugging Face repository it stands for."""

# builder name (``mistral3p5_128b``, or with ``_lora`` its LoRA builder) by HF repo id
HF_REPO_TO_SIZE = {
    "mistralai/Mistral-Medium-3.5-128B": "mistral3p5_128b",
    "mistralai/Ministral-3-3B-Instruct-2512": "ministral3_3b",
    "mistralai/Ministral-3-8B-Instruct-2512": "ministral3_8b",
    "mistralai/Ministral-3-14B-Instruct-2512": "ministral3_14b",
}
NAMED_SIZES = tuple(HF_REPO_TO_SIZE.values())
