"""ACME (RFC 8555) for the mini-CA: certbot, lego and friends get certificates from it
over HTTPS, proving control of a name with http-01 or tls-alpn-01."""
