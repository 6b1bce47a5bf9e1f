"""What revreg stores and signs: base identity hashing, safetensors I/O, keys, DSSE
signatures, and the behavior artifact format. Depends on nothing else in revreg."""
