"""Weights across the border: other projects' checkpoint formats to and from hybridlab model folders.

``mamba_ssm``: the official state-spaces/mamba ``MambaLMHeadModel`` (Mamba-3, MHA, GatedMLP).
torch only; nothing here imports the other project's code.
"""
