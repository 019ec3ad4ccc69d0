# Evaluates flake.nix's outputs against the stub nixpkgs (./stub-nixpkgs) and checks their
# structure: every package/app/check/devShell name for both systems, that each one evaluates
# completely (all builder arguments and store paths), and the NixOS module's options (types of
# defaults and of set values, rejected bad values, the service's command line).
# Run: nix-instantiate --eval --strict nix/tests/eval.nix   (ci/nix-check does)
let
  lib = import ./stub-nixpkgs/lib.nix;
  inherit (builtins) all attrNames deepSeq filter isString mapAttrs tryEval;
  nixpkgs = { outPath = ./stub-nixpkgs; inherit lib; };
  flake = import ../../flake.nix;
  # A string, not a path: nothing is copied to the store while evaluating.
  self = outputs // { outPath = "/macrescue-src"; };
  outputs = flake.outputs { inherit self nixpkgs; };

  expect = what: got: want:
    if got == want then true
    else throw "${what}: got ${builtins.toJSON got}, want ${builtins.toJSON want}";
  sort = builtins.sort builtins.lessThan;

  systems = [ "aarch64-linux" "x86_64-linux" ];
  packageNames = sort [
    "default" "restore-agent" "macrescue-init" "restore-agent-x86_64" "restore-agent-aarch64"
    "macrescue-init-x86_64" "macrescue-init-aarch64" "image-x86_64" "image-aarch64" "image-rpi"
    "qemu-x86_64" "qemu-aarch64"
  ];
  perSystem = system:
    let
      p = outputs.packages.${system};
      native = if system == "x86_64-linux" then "x86_64" else "aarch64";
      isDrv = lib.isDerivation;
    in
    all (x: x) [
      (expect "packages.${system}" (attrNames p) packageNames)
      (expect "apps.${system}" (attrNames outputs.apps.${system}) [ "default" "run-aarch64" "run-x86_64" ])
      (expect "checks.${system}" (attrNames outputs.checks.${system}) [ "boot-aarch64" "boot-x86_64" ])
      (expect "devShells.${system}" (attrNames outputs.devShells.${system}) [ "default" ])
      (all isDrv (builtins.attrValues p))
      (all isDrv (builtins.attrValues outputs.checks.${system}))
      (all (a: a.type == "app" && isString a.program) (builtins.attrValues outputs.apps.${system}))
      # Force every string (build scripts, store paths) and nested derivation.
      (deepSeq [ p outputs.apps.${system} outputs.checks.${system} outputs.devShells.${system} ] true)
      # The binaries are static and built for their own architecture, also when cross-built.
      (expect "restore-agent-aarch64 system" p.restore-agent-aarch64.system "aarch64-linux")
      (expect "restore-agent-x86_64 system" p.restore-agent-x86_64.system "x86_64-linux")
      (expect "restore-agent is native" p.restore-agent.system system)
      (expect "cargo flags" p.macrescue-init.cargoBuildFlags [ "-p" "macrescue-init" ])
      (expect "default image" p.default.name "macrescue-${native}-image")
      # Every image goes through image/build.sh in its given-inputs mode.
      (all (k: lib.isDerivation p."image-${k}"
        && builtins.match ".*MACRESCUE_KERNEL_DIR=.*MACRESCUE_BIN_DIR=.*bash image/build.sh ${k}\n.*"
          p."image-${k}".buildPhase != null) [ "x86_64" "aarch64" "rpi" ])
    ];

  # --- the NixOS module ---------------------------------------------------------------------
  module = outputs.nixosModules.default;
  evalModule = settings:
    let
      m = module {
        inherit lib;
        pkgs = import ./stub-nixpkgs { system = "x86_64-linux"; };
        config = { services.macrescue = resolved; services.usbmuxd.enable = false; };
      };
      opts = m.options.services.macrescue;
      unknown = filter (n: !(opts ? ${n})) (attrNames settings);
      check = n: o: v:
        if o.type.check v then v
        else throw "services.macrescue.${n}: ${builtins.toJSON v} is not a ${o.type.description}";
      resolved = mapAttrs (n: o: check n o (settings.${n} or o.default)) opts;
      cfg = if m.config.condition then m.config.content else { };
    in
    assert unknown == [ ] || throw "services.macrescue has no option ${toString unknown}";
    { inherit opts resolved cfg; };

  optionNames = [
    "cacheDir" "catalogUrl" "consoles" "dataDir" "enable" "extraArgs" "gpioButton" "ipswDirs"
    "manageNetwork" "maxMacs" "package" "tssUrl"
  ];
  full = evalModule {
    enable = true;
    consoles = [ "/dev/tty1" "/dev/ttyS0" ];
    gpioButton = "/dev/gpiochip0:17";
    ipswDirs = [ "/media" ];
    maxMacs = 4;
    tssUrl = "http://127.0.0.1:8080/TSS";
  };
  agent = outputs.packages.x86_64-linux.restore-agent;
  service = full.cfg.systemd.services.macrescue-station;
  moduleChecks = all (x: x) [
    (expect "module options" (attrNames full.opts) optionNames)
    (all (n: full.opts.${n} ? description) optionNames)
    (deepSeq (evalModule { }).resolved true)
    (expect "disabled module config" (evalModule { }).cfg { })
    (expect "ExecStart" service.serviceConfig.ExecStart ("${agent}/bin/restore-agent " + lib.escapeShellArgs [
      "station" "--line-mode" "--data" "/var/lib/macrescue" "--max-macs" "4"
      "--cache" "/var/lib/macrescue/ipsw" "--ipsw-dir" "/media" "--console" "/dev/tty1"
      "--console" "/dev/ttyS0" "--gpio-button" "/dev/gpiochip0:17"
      "--tss-url" "http://127.0.0.1:8080/TSS" "--no-network"
    ]))
    (expect "manageNetwork" (lib.escapeShellArgs [ "station" "--line-mode" "--data" "/d" "--max-macs" "8" ])
      (builtins.substring (builtins.stringLength "${agent}/bin/restore-agent ") 1000
        (evalModule { enable = true; manageNetwork = true; dataDir = "/d"; cacheDir = null; })
          .cfg.systemd.services.macrescue-station.serviceConfig.ExecStart))
    (expect "wantedBy" service.wantedBy [ "multi-user.target" ])
    (expect "writable paths" service.serviceConfig.ReadWritePaths [ "/var/lib/macrescue" "/var/lib/macrescue/ipsw" ])
    (expect "assertion holds" (builtins.head full.cfg.assertions).assertion true)
    # Wrong types and unknown options are refused.
    (expect "maxMacs = \"eight\"" (tryEval (deepSeq (evalModule { maxMacs = "eight"; }).resolved true)).success false)
    (expect "maxMacs = 0" (tryEval (deepSeq (evalModule { maxMacs = 0; }).resolved true)).success false)
    (expect "consoles = str" (tryEval (deepSeq (evalModule { consoles = "/dev/tty1"; }).resolved true)).success false)
    (expect "dataDir relative" (tryEval (deepSeq (evalModule { dataDir = "data"; }).resolved true)).success false)
    (expect "unknown option" (tryEval (deepSeq (evalModule { cache = "/x"; }).resolved true)).success false)
    (expect "cacheDir = null" (evalModule { enable = true; cacheDir = null; }).cfg.systemd.services.macrescue-station.serviceConfig.ReadWritePaths [ "/var/lib/macrescue" ])
  ];
in
assert expect "systems" (sort (attrNames outputs.packages)) systems;
assert all perSystem systems;
assert moduleChecks;
"flake outputs and NixOS module evaluate: ${toString (builtins.length packageNames)} packages x ${toString (builtins.length systems)} systems, ${toString (builtins.length optionNames)} module options"
