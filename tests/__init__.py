"""inferwatch's tests, mirroring the packages."""
