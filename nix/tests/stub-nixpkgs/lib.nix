# The part of nixpkgs' lib that flake.nix and nix/ use, with the same names and meanings, so
# their evaluation can be checked without nixpkgs (CI has no Nix cache and no GitHub access).
# Options carry a type whose `check` the test applies to defaults and to set values.
let
  inherit (builtins) all attrNames concatMap concatStringsSep elem filter isAttrs isBool isInt
    isList isString listToAttrs map replaceStrings toString;
  mkType = name: check: { _type = "option-type"; inherit name check; description = name; };
in
rec {
  genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
  optional = cond: x: if cond then [ x ] else [ ];
  optionals = cond: xs: if cond then xs else [ ];
  inherit concatMap;
  makeBinPath = pkgs: concatStringsSep ":" (map (p: "${p}/bin") pkgs);
  escapeShellArg = a: "'${replaceStrings [ "'" ] [ "'\\''" ] (toString a)}'";
  escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);
  isDerivation = x: isAttrs x && (x.type or null) == "derivation";
  licenses.asl20 = { spdxId = "Apache-2.0"; };

  mkOption = attrs:
    let unknown = filter (n: !(elem n [ "type" "default" "defaultText" "example" "description" ])) (attrNames attrs);
    in
    assert unknown == [ ] || throw "mkOption: unknown attributes ${toString unknown}";
    attrs // { _type = "option"; };
  mkEnableOption = name: mkOption {
    type = types.bool;
    default = false;
    example = true;
    description = "Whether to enable ${name}.";
  };
  mkIf = condition: content: { _type = "if"; inherit condition content; };

  types = rec {
    bool = mkType "bool" isBool;
    str = mkType "str" isString;
    # A path option takes an absolute path as a string or a Nix path.
    path = mkType "path" (v: (isString v && builtins.substring 0 1 v == "/") || builtins.isPath v || isDerivation v);
    package = mkType "package" isDerivation;
    ints.positive = mkType "positive int" (v: isInt v && v > 0);
    listOf = t: mkType "list of ${t.name}" (v: isList v && all t.check v);
    nullOr = t: mkType "null or ${t.name}" (v: v == null || t.check v);
  };
}
