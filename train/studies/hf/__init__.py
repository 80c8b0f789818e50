"""Studies on pretrained Hugging Face models with our blocks swapped in (``arch.interop``)."""
