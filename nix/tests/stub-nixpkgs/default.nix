# A stand-in for `import nixpkgs { system = …; }` that provides exactly the attributes nix/
# touches. Builders check the arguments they are given (names and types) and return fake
# derivations with a store-path-like outPath, so evaluating the flake's outputs proves the
# attribute paths exist and the builders get what they expect, without building anything.
{ system ? "x86_64-linux", static ? false }:
let
  lib = import ./lib.nix;
  inherit (builtins) all attrNames elem filter isAttrs isBool isFunction isList isString;
  hash = builtins.substring 0 32 (builtins.hashString "sha256" "${system}${toString static}");
  drv = name: attrs: attrs // {
    type = "derivation";
    inherit name system;
    outPath = "/nix/store/${hash}-${name}";
    overrideAttrs = f: drv name (attrs // f attrs);
  };
  only = what: allowed: args:
    let unknown = filter (n: !(elem n allowed)) (attrNames args);
    in assert unknown == [ ] || throw "${what}: unexpected arguments ${toString unknown}"; args;
  need = what: cond: assert cond || throw "${what}: bad arguments"; true;
  leaf = name: drv name { };
  arch = if system == "aarch64-linux" then "aarch64" else "x86_64";
  self = {
    inherit lib;
    stdenv.hostPlatform = {
      inherit system;
      linux-kernel.target = if arch == "aarch64" then "Image" else "bzImage";
    };
    rustPlatform.buildRustPackage = args:
      let a = only "buildRustPackage" [ "pname" "version" "src" "cargoLock" "cargoBuildFlags" "doCheck" "meta" ] args;
      in assert need "buildRustPackage" (isString a.pname && isString a.version
        && isString a.cargoLock.lockFile && isList a.cargoBuildFlags && isBool a.doCheck);
      drv "${a.pname}-${a.version}" a;
    stdenvNoCC.mkDerivation = args:
      let a = only "mkDerivation" [ "name" "src" "nativeBuildInputs" "dontConfigure" "dontInstall"
        "dontFixup" "buildPhase" "passthru" ] args;
      in assert need "mkDerivation" (isString a.name && isString a.buildPhase
        && all lib.isDerivation a.nativeBuildInputs);
      drv a.name (a // a.passthru);
    runCommand = name: env: script:
      assert need "runCommand ${name}" (isAttrs env && isString script); drv name { inherit script; };
    writeShellScriptBin = name: text:
      assert need "writeShellScriptBin" (isString text); drv name { inherit text; };
    mkShell = args:
      let a = only "mkShell" [ "packages" ] args;
      in assert need "mkShell" (all lib.isDerivation a.packages); drv "nix-shell" a;
    makeModulesClosure = args:
      let a = only "makeModulesClosure" [ "kernel" "firmware" "rootModules" "allowMissing" ] args;
      in assert need "makeModulesClosure" (lib.isDerivation a.kernel && all isString a.rootModules);
      drv "kernel-modules" a;
    linuxPackages.kernel = drv "linux-6.6.60" { modDirVersion = "6.6.60"; };
    OVMF = leaf "OVMF" // { fd = leaf "OVMF-fd"; };
    pkgsStatic = import ./default.nix { inherit system; static = true; };
    pkgsCross = {
      gnu64 = import ./default.nix { system = "x86_64-linux"; };
      musl64 = import ./default.nix { system = "x86_64-linux"; };
      aarch64-multiplatform = import ./default.nix { system = "aarch64-linux"; };
      aarch64-multiplatform-musl = import ./default.nix { system = "aarch64-linux"; };
    };
  } // lib.genAttrs [
    "bash" "coreutils" "findutils" "gnused" "gawk" "gnugrep" "cpio" "zstd" "lz4" "xz"
    "binutils-unwrapped-all-targets" "mtools" "dosfstools" "exfatprogs" "util-linux" "busybox"
    "systemd" "raspberrypifw" "qemu" "cargo" "rustc" "clippy" "rustfmt" "pkg-config" "kmod"
    "sbsigntool" "nixpkgs-fmt"
  ] leaf;
in
self
