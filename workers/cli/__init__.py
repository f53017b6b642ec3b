"""The `moeserve` command line."""
