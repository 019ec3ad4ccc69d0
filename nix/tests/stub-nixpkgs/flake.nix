# Lets `nix eval --override-input nixpkgs path:nix/tests/stub-nixpkgs` evaluate the real flake
# (inputs, self, lock handling) against the stub; `import nixpkgs { … }` reads default.nix.
{
  outputs = { self }: { lib = import ./lib.nix; };
}
