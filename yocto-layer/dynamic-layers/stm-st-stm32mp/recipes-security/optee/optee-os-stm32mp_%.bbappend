# Build OP-TEE's PKCS#11 TA into the OP-TEE image as an early TA, so the hsm0
# crypto service reaches the secure world through libckteec with nothing to load
# from the (read-only) root file system.
EXTRA_OEMAKE:append:edgekms-os = " CFG_PKCS11_TA=y CFG_IN_TREE_EARLY_TAS=pkcs11/fd02c9da-306c-48c7-a49c-bbd827ae86ee"
