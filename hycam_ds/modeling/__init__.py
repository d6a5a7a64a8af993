"""HyCAM itself: its config, the modules of one decoder layer, their injection into any supported
family, the balance loss, routing statistics, adapter files, the paper's equation written plainly
(reference.py) and small backbones built in code. Imports torch, transformers and safetensors only."""
