"""The modulation's mathematics, faster and never different: the torch-ops autograd function, the
fused CPU kernel (csrc/) and its loader, and the oneDNN projection. Imports torch only; every path
is tested against hycam_ds.modeling.reference."""
