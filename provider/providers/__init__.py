"""The dynamic providers the Pulumi engine drives: check · diff · create · read · update · delete, one
module per resource (model, lora_addon, deployment) on a shared base; `diff_rules` says what each change
means."""
