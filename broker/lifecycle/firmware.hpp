// UEFI firmware for a domain. OVMF's code (read-only) and the domain's own variable store
// (read-write) are opened by the broker and reach QEMU at spawn as fdsets (-add-fd), under pflash
// block nodes: QEMU opens no firmware path. The store is the broker's own copy of OVMF's template
// in FirmwareConfig::nvram_dir, made on the domain's first start and kept across its restarts and
// re-creates, or a file the caller names beneath an image root. SeaBIOS needs nothing of this:
// QEMU finds it in the read-only /usr of its jail, as it does its option ROMs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "broker/core/error.hpp"
#include "broker/lifecycle/fd_handover.hpp"
#include "broker/lifecycle/spec.hpp"
#include "fdpass/opener.hpp"

namespace broker::lifecycle {

struct FirmwareConfig {
  std::string ovmf_dir = "/usr/share/OVMF";
  std::string nvram_dir = "/var/lib/qbroker/nvram";  // the broker's variable stores, one per domain
};

// The firmware's fdsets, chosen at spawn far above the ids QEMU picks at run time (the lowest
// free ones), and their opaques (no user device id starts with "qb-").
inline constexpr std::int64_t kFirmwareCodeFdset = 1000;
inline constexpr std::int64_t kFirmwareVarsFdset = 1001;
inline constexpr std::string_view kFirmwareCodeOpaque = "qb:qb-fw-code";
inline constexpr std::string_view kFirmwareVarsOpaque = "qb:qb-fw-vars";

// The OVMF files of a domain: code and variable-store template.
struct OvmfFiles {
  std::string code;
  std::string vars_template;
};
OvmfFiles ovmf_files(const FirmwareConfig& config, bool secure_boot);

// Where the broker keeps the variable store of domain `name` (secure boot has its own, made from
// the template with Microsoft's keys).
std::string nvram_store(const FirmwareConfig& config, const std::string& name, bool secure_boot);

// For a UEFI domain: opens OVMF's code and the domain's variable store (creating the broker's
// copy from the template when it has none yet) into `fds`, and returns the QEMU arguments that
// make them the machine's pflash. Errors name the field: firmware (OVMF missing), nvram.
Result<std::vector<std::string>> hand_over_uefi(const DomainSpec& spec, const FirmwareConfig& config,
                                                const fdpass::ImageRoots& roots, FdHandover& fds);

// Removes the broker's variable stores of domain `name`, if any.
Result<void> purge_nvram(const FirmwareConfig& config, const std::string& name);

}  // namespace broker::lifecycle
