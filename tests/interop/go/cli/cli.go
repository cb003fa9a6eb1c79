// Package cli holds the command-line helpers shared by go-server and
// go-client.
package cli

import (
	"flag"
	"fmt"
	"strings"
)

// SocketPath turns an ADDRESS argument into a path for the "unix" network.
// Accepted forms: "unix:///some/path", "unix://@abstract-name" and a bare
// filesystem path. Abstract names keep their leading '@', which is how
// Go's net package spells them on Linux.
func SocketPath(address string) (string, error) {
	path := address
	if strings.HasPrefix(address, "unix://") {
		path = strings.TrimPrefix(address, "unix://")
	} else if strings.Contains(address, "://") {
		return "", fmt.Errorf("unsupported address %q: only unix:// is supported", address)
	}
	if path == "" || path == "@" {
		return "", fmt.Errorf("empty socket path in address %q", address)
	}
	return path, nil
}

// IsAbstract reports whether a socket path names a Linux abstract socket.
func IsAbstract(path string) bool {
	return strings.HasPrefix(path, "@")
}

// ParseMixed parses args with fs, allowing flags before and after the
// positional arguments (the standard flag package stops at the first
// positional one). It returns the positional arguments in order.
func ParseMixed(fs *flag.FlagSet, args []string) ([]string, error) {
	var positional []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return positional, nil
		}
		positional = append(positional, rest[0])
		args = rest[1:]
	}
}
