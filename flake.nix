{
  description = "macrescue: a tiny bootable image that revives and restores Apple Silicon Macs over USB-C";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  # Everything is built by nix/default.nix; the images themselves by image/build.sh, the same
  # assembly script the Debian CI path runs (nix/README.md).
  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f (import ./nix {
        inherit nixpkgs system;
        src = self;
      }));
    in
    {
      packages = forAllSystems (m: m.packages);
      apps = forAllSystems (m: m.apps);
      checks = forAllSystems (m: m.checks);
      devShells = forAllSystems (m: m.devShells);
      formatter = forAllSystems (m: m.formatter);

      # Runs `restore-agent station` on an existing NixOS machine (nix/module.nix).
      nixosModules.default = import ./nix/module.nix {
        packageFor = system: self.packages.${system}.restore-agent;
      };
    };
}
