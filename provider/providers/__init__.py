"""The dynamic providers the Pulumi engine drives: check · diff · create · read · update · delete."""
