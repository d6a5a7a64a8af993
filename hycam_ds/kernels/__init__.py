"""The modulation's mathematics, faster and never different: the torch-ops autograd function, the
fused CPU kernel (csrc/) and its loader, and the oneDNN projection; and the token cross-entropy in
chunks (cross_entropy.py), whose memory does not grow with the vocabulary. Imports torch only; every
path is tested against a plain statement (hycam_ds.modeling.reference, F.cross_entropy)."""
