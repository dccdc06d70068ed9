# EdgeKMS distribution only: systemd-cryptsetup and systemd-cryptenroll with TPM 2.0
# support, which open the encrypted data partition (edgekms-datafs) with a key sealed to
# the board's TPM.
PACKAGECONFIG:append:edgekms-os = " cryptsetup openssl tpm2"
