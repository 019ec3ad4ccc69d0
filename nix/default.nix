# Everything the flake offers for one build system. The images are assembled by image/build.sh
# (the same script CI runs on Debian) in its "given inputs" mode: Nix supplies the kernel and
# module closure, the static binaries and the EFI stub; build.sh does initramfs, UKI, ESP, data
# partition and GPT exactly as on Debian.
{ nixpkgs, system, src }:
let
  pkgs = import nixpkgs { inherit system; };
  inherit (pkgs) lib;
  version = "0.1.0";
  native = if system == "aarch64-linux" then "aarch64" else "x86_64";

  # Package sets whose programs run on each target: native, or cross-compiled from this host.
  # The binaries are fully static (musl), like the Debian path's.
  targetSets = {
    x86_64 = if native == "x86_64" then pkgs else pkgs.pkgsCross.gnu64;
    aarch64 = if native == "aarch64" then pkgs else pkgs.pkgsCross.aarch64-multiplatform;
  };
  staticSets = {
    x86_64 = if native == "x86_64" then pkgs.pkgsStatic else pkgs.pkgsCross.musl64.pkgsStatic;
    aarch64 =
      if native == "aarch64" then pkgs.pkgsStatic
      else pkgs.pkgsCross.aarch64-multiplatform-musl.pkgsStatic;
  };
  efiArch = { x86_64 = "x64"; aarch64 = "aa64"; };
  serial = { x86_64 = "ttyS0,115200n8"; aarch64 = "ttyAMA0,115200n8"; };

  # The drivers image/build.sh keeps (MODULES there), plus the boards' own NICs and USB hosts
  # for aarch64 (virt, Raspberry Pi 4/5). Missing names are skipped (allowMissing).
  modules = {
    common = [
      "xhci-pci" "ehci-pci" "ohci-pci" "uhci-hcd" "usb-storage" "uas" "sd_mod" "vfat" "exfat"
      "nls_cp437" "nls_ascii" "nls_utf8" "nls_iso8859-1" "virtio_net" "virtio_pci" "e1000"
      "e1000e" "r8169" "vhci-hcd"
      # USB keyboards (erase confirmation, emergency shell): usbhid and the HID drivers that
      # claim common keyboards before hid-generic would.
      "usbhid" "hid-generic" "hid-apple" "hid-logitech" "hid-logitech-dj" "hid-microsoft"
      "hid-lenovo" "hid-cherry" "hid-chicony"
    ];
    aarch64 = [
      "xhci-plat-hcd" "ehci-platform" "ohci-platform" "dwc2" "dwc3" "dwc3-of-simple"
      "reset-raspberrypi" "sdhci-iproc" "bcm2835" "bcm2835_wdt" "virtio_mmio" "genet"
      "mdio-bcm-unimac" "broadcom" "bcm7xxx" "smsc95xx" "lan78xx" "r8152" "cdc_ether"
      "ax88179_178a" "macb" "mmc_block"
      # Raspberry Pi 5 (RP1 behind PCIe, its SD card) and both Pis' SD power regulators.
      "fixed" "gpio-regulator" "rp1_pci" "clk-rp1" "pinctrl-rp1" "irq-bcm2712-mip"
      "sdhci-brcmstb" "pinctrl-brcmstb-bcm2712" "gpio-brcmstb"
    ];
  };

  perArch = arch:
    let
      t = targetSets.${arch};
      s = staticSets.${arch};
      crate = pname: s.rustPlatform.buildRustPackage {
        inherit pname version src;
        cargoLock.lockFile = "${src}/Cargo.lock";
        cargoBuildFlags = [ "-p" pname ];
        # The test suite needs ../shared fixtures and the simulators; ci/test runs it.
        doCheck = false;
        meta = {
          description = "macrescue ${pname} (static, ${arch})";
          mainProgram = pname;
          license = lib.licenses.asl20;
        };
      };
      agent = crate "restore-agent";
      init = crate "macrescue-init";
      kernel = t.linuxPackages.kernel;
      kernelTarget = t.stdenv.hostPlatform.linux-kernel.target;
      closure = t.makeModulesClosure {
        inherit kernel;
        firmware = kernel;
        rootModules = modules.common ++ lib.optionals (arch == "aarch64") modules.aarch64;
        allowMissing = true;
      };
      # ci/vm/kernel.sh's output layout, which MACRESCUE_KERNEL_DIR expects.
      # nixpkgs ships modules as .ko.xz; the init loads plain .ko on any kernel (a compressed
      # one only where the kernel decompresses itself), so unpack them and index again.
      kernelDir = pkgs.runCommand "macrescue-kernel-${arch}"
        { nativeBuildInputs = [ pkgs.xz pkgs.zstd pkgs.kmod ]; } ''
        mkdir -p $out/modules
        cp ${kernel}/${kernelTarget} $out/vmlinuz
        echo ${kernel.modDirVersion} > $out/kernel.version
        cp ${s.busybox}/bin/busybox $out/busybox
        cp -r ${closure}/lib $out/modules/lib
        # The Raspberry Pi device trees, flat, as ci/vm/kernel.sh leaves them.
        if [ -d ${kernel}/dtbs/broadcom ]; then
          mkdir -p $out/dtbs
          cp ${kernel}/dtbs/broadcom/*.dtb $out/dtbs/
        fi
        chmod -R u+w $out
        find $out/modules -name '*.ko.xz' -exec xz -d {} +
        find $out/modules -name '*.ko.zst' -exec zstd -q -d --rm {} +
        depmod -b $out/modules ${kernel.modDirVersion}
      '';
      bins = pkgs.runCommand "macrescue-bin-${arch}" { } ''
        mkdir -p $out
        ln -s ${agent}/bin/restore-agent $out/restore-agent
        ln -s ${init}/bin/macrescue-init $out/macrescue-init
      '';
      stub = "${t.systemd}/lib/systemd/boot/efi/linux${efiArch.${arch}}.efi.stub";
      # KIND: x86_64 | aarch64 (UEFI USB stick) | rpi (Raspberry Pi 4/5 SD card).
      image = kind: pkgs.stdenvNoCC.mkDerivation {
        name = "macrescue-${kind}-image";
        inherit src;
        nativeBuildInputs = with pkgs; [
          bash coreutils findutils gnused gawk gnugrep cpio zstd lz4 xz
          binutils-unwrapped-all-targets mtools dosfstools exfatprogs util-linux
        ];
        dontConfigure = true;
        dontInstall = true;
        dontFixup = true;
        buildPhase = ''
          runHook preBuild
          patchShebangs image ci
          # build.sh calls the arm64 objcopy by its Debian cross name; this one knows every target.
          mkdir -p $TMPDIR/bin
          ln -s "$(command -v objcopy)" $TMPDIR/bin/aarch64-linux-gnu-objcopy
          export PATH=$TMPDIR/bin:$PATH
          export MACRESCUE_OUT=$TMPDIR/out
          export MACRESCUE_KERNEL_DIR=${kernelDir} MACRESCUE_BIN_DIR=${bins}
          export MACRESCUE_EFI_STUB=${stub}
          # The data partition is formatted on the build machine: its own macrescue-datapart.
          export MACRESCUE_DATAPART=${here.init}/bin/macrescue-datapart
          export MACRESCUE_RPI_FIRMWARE=${pkgs.raspberrypifw}/share/raspberrypi/boot
          export MACRESCUE_IMAGE_OUT=$out/parts MACRESCUE_IMAGE=$out/macrescue-${kind}.img
          bash image/build.sh ${kind}
          runHook postBuild
        '';
        passthru = { inherit kernelDir bins; };
      };
      usbImage = image arch;
      # Direct boot without firmware: kernel + the image's initramfs + its command line.
      qemuBoot = pkgs.runCommand "macrescue-qemu-${arch}" { } ''
        mkdir -p $out
        ln -s ${kernel}/${kernelTarget} $out/kernel
        ln -s ${usbImage}/parts/initramfs.img $out/initramfs.img
        echo 'console=${serial.${arch}} loglevel=4 panic=10 macrescue.station="restore-agent station --data /data --cache /data/ipsw --ipsw-dir /media"' > $out/cmdline
      '';
      firmware =
        if arch == "x86_64" then {
          code = "${t.OVMF.fd}/FV/OVMF_CODE.fd";
          vars = "${t.OVMF.fd}/FV/OVMF_VARS.fd";
        } else {
          code = "${t.OVMF.fd}/FV/AAVMF_CODE.fd";
          vars = "${t.OVMF.fd}/FV/AAVMF_VARS.fd";
        };
      runner = name: extra: pkgs.writeShellScriptBin name ''
        export PATH=${lib.makeBinPath [ pkgs.qemu pkgs.coreutils ]}:$PATH
        export MACRESCUE_OVMF_CODE=${firmware.code} MACRESCUE_OVMF_VARS=${firmware.vars}
        exec ${pkgs.bash}/bin/bash ${./qemu.sh} ${extra} ${arch} ${usbImage}/macrescue-${arch}.img "$@"
      '';
    in
    {
      inherit agent init kernelDir image usbImage qemuBoot;
      run = runner "macrescue-run-${arch}" "";
      bootCheck = pkgs.runCommand "macrescue-boot-${arch}" { } ''
        ${runner "macrescue-boot-check-${arch}" "--check"}/bin/macrescue-boot-check-${arch}
        touch $out
      '';
    };

  x86 = perArch "x86_64";
  arm = perArch "aarch64";
  here = if native == "x86_64" then x86 else arm;
  rpiImage = arm.image "rpi";
in
{
  packages = {
    restore-agent = here.agent;
    macrescue-init = here.init;
    restore-agent-x86_64 = x86.agent;
    restore-agent-aarch64 = arm.agent;
    macrescue-init-x86_64 = x86.init;
    macrescue-init-aarch64 = arm.init;
    image-x86_64 = x86.usbImage;
    image-aarch64 = arm.usbImage;
    image-rpi = rpiImage;
    qemu-x86_64 = x86.qemuBoot;
    qemu-aarch64 = arm.qemuBoot;
    default = here.usbImage;
  };

  apps = {
    run-x86_64 = { type = "app"; program = "${x86.run}/bin/macrescue-run-x86_64"; };
    run-aarch64 = { type = "app"; program = "${arm.run}/bin/macrescue-run-aarch64"; };
    default = { type = "app"; program = "${here.run}/bin/macrescue-run-${native}"; };
  };

  # The QEMU boot test: UEFI firmware, the image as a USB stick on xHCI, station ready.
  checks = {
    boot-x86_64 = x86.bootCheck;
    boot-aarch64 = arm.bootCheck;
  };

  devShells.default = pkgs.mkShell {
    packages = with pkgs; [
      cargo rustc clippy rustfmt pkg-config
      qemu cpio zstd lz4 xz mtools dosfstools exfatprogs util-linux kmod sbsigntool
    ];
  };

  formatter = pkgs.nixpkgs-fmt;
}
