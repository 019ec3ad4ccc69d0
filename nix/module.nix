# NixOS module: run the macrescue station (`restore-agent station`) as a systemd service on an
# existing NixOS machine. Options: nix/README.md. The flake passes `packageFor`, which gives the
# static agent for a system.
{ packageFor ? null }:
{ config, lib, pkgs, ... }:
let
  cfg = config.services.macrescue;
  inherit (lib) mkEnableOption mkIf mkOption types;
  args = [ "station" "--line-mode" "--data" cfg.dataDir "--max-macs" (toString cfg.maxMacs) ]
    ++ lib.optionals (cfg.cacheDir != null) [ "--cache" cfg.cacheDir ]
    ++ lib.concatMap (d: [ "--ipsw-dir" d ]) cfg.ipswDirs
    ++ lib.concatMap (c: [ "--console" c ]) cfg.consoles
    ++ lib.optionals (cfg.gpioButton != null) [ "--gpio-button" cfg.gpioButton ]
    ++ lib.optionals (cfg.catalogUrl != null) [ "--catalog-url" cfg.catalogUrl ]
    ++ lib.optionals (cfg.tssUrl != null) [ "--tss-url" cfg.tssUrl ]
    ++ lib.optional (!cfg.manageNetwork) "--no-network"
    ++ cfg.extraArgs;
in
{
  options.services.macrescue = {
    enable = mkEnableOption "the macrescue station: every Apple Silicon Mac plugged in over USB-C in DFU mode is revived (or, when confirmed, erased and restored)";

    package = mkOption {
      type = types.package;
      default = packageFor pkgs.stdenv.hostPlatform.system;
      defaultText = "the flake's restore-agent for this system";
      description = "Package providing bin/restore-agent.";
    };

    dataDir = mkOption {
      type = types.path;
      default = "/var/lib/macrescue";
      description = "Reports (DIR/reports) and per-Mac logs (DIR/logs).";
    };

    cacheDir = mkOption {
      type = types.nullOr types.path;
      default = "/var/lib/macrescue/ipsw";
      description = "IPSW cache; null streams every IPSW from Apple and keeps nothing.";
    };

    ipswDirs = mkOption {
      type = types.listOf types.path;
      default = [ ];
      example = [ "/srv/ipsw" "/media" ];
      description = "More directories searched (3 levels deep) for a *.ipsw matching the Mac's build.";
    };

    consoles = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "/dev/tty1" "/dev/ttyS0" ];
      description = "Local ttys where erase codes are shown and typed. Without a console or GPIO button nothing is ever erased.";
    };

    gpioButton = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "header:17";
      description = "A GPIO erase-confirmation button (header:LINE for a Raspberry Pi's 40-pin header, /dev/gpiochipN:LINE, or a sysfs value file), held 3 s.";
    };

    maxMacs = mkOption {
      type = types.ints.positive;
      default = 8;
      description = "How many Macs are worked on at once.";
    };

    catalogUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "IPSW catalog URL instead of Apple's (passed as --catalog-url).";
    };

    tssUrl = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "TSS (signing) server URL instead of Apple's (passed as --tss-url).";
    };

    manageNetwork = mkOption {
      type = types.bool;
      default = false;
      description = "Let the station bring up wired links itself (DHCP, SLAAC, SNTP) as it does in the image. Leave off where NixOS manages the network; the station then passes --no-network.";
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More arguments for `restore-agent station`.";
    };
  };

  config = mkIf cfg.enable {
    systemd.services.macrescue-station = {
      description = "macrescue station (restores Apple Silicon Macs over USB-C)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "time-sync.target" ];
      serviceConfig = {
        ExecStart = "${cfg.package}/bin/restore-agent ${lib.escapeShellArgs args}";
        Restart = "always";
        RestartSec = 2;
        # Raw USB (/dev/bus/usb) and the consoles need root; everything else is read-only.
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        ReadWritePaths = [ cfg.dataDir ] ++ lib.optional (cfg.cacheDir != null) cfg.cacheDir;
      };
    };
    systemd.tmpfiles.rules = [ "d ${cfg.dataDir} 0750 root root -" ]
      ++ lib.optional (cfg.cacheDir != null) "d ${cfg.cacheDir} 0750 root root -";
    assertions = [{
      # usbmuxd would claim the Mac in restore mode and the restore would fail.
      assertion = !(config.services.usbmuxd.enable or false);
      message = "services.macrescue cannot run next to services.usbmuxd: usbmuxd takes the Mac's restore-mode interface; disable one of them.";
    }];
  };
}
