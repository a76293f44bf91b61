"""Fine-tuning beside the ie_jax models: LoRA / QLoRA transforms, SFT and DPO data and losses, the trainer, orbax
checkpoints and PEFT / HF export. `scripts/finetune_lora.py` is the command-line front end."""
from finetune.data import DataConfig, preference_dataset, sft_dataset
from finetune.export import load_peft_adapter, save_merged, save_peft_adapter
from finetune.lora import LoraConfig, LoRALinear, LoRAParam, apply_lora, merge_lora
from finetune.losses import DPOConfig, dpo_loss
from finetune.qlora import NF4Linear, quantize_base
from finetune.trainer import TrainConfig, Trainer

__all__ = ["DPOConfig", "DataConfig", "LoRALinear", "LoRAParam", "LoraConfig", "NF4Linear", "TrainConfig", "Trainer",
           "apply_lora", "dpo_loss", "load_peft_adapter", "merge_lora", "preference_dataset", "quantize_base",
           "save_merged", "save_peft_adapter", "sft_dataset"]
