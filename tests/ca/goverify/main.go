// Command goverify checks a leaf <- intermediate <- root chain with Go's crypto/x509,
// so the test suite can show that a third verifier (after openssl and GnuTLS) enforces
// the intermediate's name constraints on its own. Standard library only: it builds in
// GOPATH mode (GO111MODULE=off) with nothing to download.
//
// Usage: goverify ROOT.pem INTERMEDIATE.pem LEAF.pem DNSNAME
//
// Prints "OK" and exits 0 when the chain verifies for DNSNAME with the serverAuth key
// usage; prints "FAIL: <Go's error>" and exits 1 when it does not; exits 2 on bad input.
package main

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
)

func load(path string) (*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s: no PEM CERTIFICATE block", path)
	}
	return x509.ParseCertificate(block.Bytes)
}

func main() {
	if len(os.Args) != 5 {
		fmt.Fprintln(os.Stderr, "usage: goverify ROOT.pem INTERMEDIATE.pem LEAF.pem DNSNAME")
		os.Exit(2)
	}
	var certs [3]*x509.Certificate
	for i, path := range os.Args[1:4] {
		cert, err := load(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "ERROR:", err)
			os.Exit(2)
		}
		certs[i] = cert
	}
	roots := x509.NewCertPool()
	roots.AddCert(certs[0])
	intermediates := x509.NewCertPool()
	intermediates.AddCert(certs[1])
	_, err := certs[2].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: intermediates,
		DNSName:       os.Args[4],
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		fmt.Println("FAIL:", err)
		os.Exit(1)
	}
	fmt.Println("OK")
}
