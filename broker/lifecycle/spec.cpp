#include "broker/lifecycle/spec.hpp"

#include <algorithm>

#include <boost/json.hpp>

#include "broker/lifecycle/errc.hpp"

namespace broker::lifecycle {
namespace json = boost::json;
namespace {

Error field_error(std::string_view field, std::string msg) {
  Error e(make_error_code(errc::invalid_spec), std::string(field) + ": " + msg);
  e.field = std::string(field);
  return e;
}

constexpr std::uint32_t kMinMemory = 16;
constexpr std::uint32_t kMaxMemory = 1U << 20;  // 1 TiB
constexpr std::uint32_t kMaxVcpus = 255;
constexpr std::uint32_t kMaxPciSlots = 32;
constexpr std::size_t kMaxAppend = 4096;
constexpr std::size_t kMaxPath = 4096;

Result<std::string> get_string(const json::object& o, std::string_view key, bool required) {
  auto it = o.find(key);
  if (it == o.end()) {
    if (required) return field_error(key, "is required");
    return std::string();
  }
  if (!it->value().is_string()) return field_error(key, "must be a string");
  return std::string(it->value().get_string());
}

Result<std::uint32_t> get_uint(const json::object& o, std::string_view key, std::uint32_t dflt) {
  auto it = o.find(key);
  if (it == o.end()) return dflt;
  const auto& v = it->value();
  if (v.is_uint64() && v.get_uint64() <= 0xffffffffU) return static_cast<std::uint32_t>(v.get_uint64());
  if (v.is_int64() && v.get_int64() >= 0 && v.get_int64() <= 0xffffffff) {
    return static_cast<std::uint32_t>(v.get_int64());
  }
  return field_error(key, "must be a non-negative integer");
}

}  // namespace

bool valid_name(std::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  auto ok = [](char c, bool first) {
    bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
    return alnum || (!first && (c == '_' || c == '.' || c == '-'));
  };
  if (!ok(name[0], true)) return false;
  return std::all_of(name.begin() + 1, name.end(), [&](char c) { return ok(c, false); });
}

std::string_view to_string(Machine m) { return m == Machine::q35 ? "q35" : "none"; }
std::string_view to_string(Firmware f) { return f == Firmware::uefi ? "uefi" : "bios"; }
std::string_view to_string(Accel a) {
  switch (a) {
    case Accel::kvm: return "kvm";
    case Accel::tcg: return "tcg";
    case Accel::automatic: break;
  }
  return "auto";
}

Result<void> validate(const DomainSpec& s) {
  if (!valid_name(s.name)) {
    return field_error("name", "must be 1-64 characters of A-Z a-z 0-9 _ . - and start with a letter or digit");
  }
  if (s.memory_mib < kMinMemory || s.memory_mib > kMaxMemory) {
    return field_error("memory_mib", "must be between " + std::to_string(kMinMemory) + " and " +
                                         std::to_string(kMaxMemory));
  }
  if (s.vcpus < 1 || s.vcpus > kMaxVcpus) {
    return field_error("vcpus", "must be between 1 and " + std::to_string(kMaxVcpus));
  }
  if (s.pci_slots > kMaxPciSlots) {
    return field_error("pci_slots", "must be at most " + std::to_string(kMaxPciSlots));
  }
  if (s.machine == Machine::none && (!s.kernel.empty() || !s.initrd.empty())) {
    return field_error("kernel", "machine none boots nothing: kernel and initrd must be empty");
  }
  if (s.machine == Machine::none &&
      (s.firmware != Firmware::bios || s.secure_boot || !s.boot_order.empty() || !s.nvram.empty())) {
    return field_error("firmware", "machine none boots nothing: it takes no firmware, boot_order or nvram");
  }
  if (!s.initrd.empty() && s.kernel.empty()) return field_error("initrd", "needs a kernel");
  if (!s.kernel.empty() && s.firmware == Firmware::uefi) {
    return field_error("firmware", "uefi boots from a disk or CD; a kernel is booted directly "
                                   "through SeaBIOS (leave out firmware, or the kernel)");
  }
  if (!s.kernel.empty() && !s.boot_order.empty()) {
    return field_error("boot_order", "a domain with a kernel boots it directly; boot_order is for "
                                     "firmware boot from a disk or CD");
  }
  if (s.secure_boot && s.firmware != Firmware::uefi) {
    return field_error("secure_boot", "needs firmware uefi");
  }
  if (!s.nvram.empty() && s.firmware != Firmware::uefi) {
    return field_error("nvram", "is the UEFI variable store: it needs firmware uefi");
  }
  for (std::size_t i = 0; i < s.boot_order.size(); ++i) {
    const auto& id = s.boot_order[i];
    if (!valid_name(id)) return field_error("boot_order", "'" + id + "' is not a device id");
    if (std::find(s.boot_order.begin(), s.boot_order.begin() + static_cast<std::ptrdiff_t>(i), id) !=
        s.boot_order.begin() + static_cast<std::ptrdiff_t>(i)) {
      return field_error("boot_order", "'" + id + "' is listed twice");
    }
  }
  for (auto [field, path] : {std::pair{"kernel", &s.kernel}, std::pair{"initrd", &s.initrd},
                             std::pair{"nvram", &s.nvram}}) {
    if (path->empty()) continue;
    if (path->front() != '/' || path->size() > kMaxPath ||
        path->find('\0') != std::string::npos) {
      return field_error(field, "must be an absolute path");
    }
  }
  if (s.append.size() > kMaxAppend) {
    return field_error("append", "is longer than " + std::to_string(kMaxAppend) + " bytes");
  }
  if (!std::all_of(s.append.begin(), s.append.end(), [](char c) { return c >= 0x20 && c < 0x7f; })) {
    return field_error("append", "must be printable ASCII");
  }
  return {};
}

Result<DomainSpec> parse_domain_spec(const json::value& body,
                                     const std::vector<std::string_view>& also_allowed) {
  if (!body.is_object()) return field_error("body", "must be a JSON object");
  const auto& o = body.get_object();
  static constexpr std::string_view kKnown[] = {
      "name",      "machine", "accel",    "memory_mib",  "vcpus",      "kernel",    "initrd",
      "append",    "pci_slots", "paused", "firmware",    "secure_boot", "boot_order", "nvram"};
  for (const auto& kv : o) {
    std::string_view k = kv.key();
    if (std::find(std::begin(kKnown), std::end(kKnown), k) == std::end(kKnown) &&
        std::find(also_allowed.begin(), also_allowed.end(), k) == also_allowed.end()) {
      return field_error(k, "unknown field");
    }
  }
  DomainSpec s;
  auto name = get_string(o, "name", true);
  if (!name) return name.error();
  s.name = *name;
  auto machine = get_string(o, "machine", false);
  if (!machine) return machine.error();
  if (*machine == "none") s.machine = Machine::none;
  else if (!machine->empty() && *machine != "q35") return field_error("machine", "must be q35 or none");
  auto accel = get_string(o, "accel", false);
  if (!accel) return accel.error();
  if (*accel == "kvm") s.accel = Accel::kvm;
  else if (*accel == "tcg") s.accel = Accel::tcg;
  else if (!accel->empty() && *accel != "auto") return field_error("accel", "must be auto, kvm or tcg");
  for (auto [key, out, dflt] : {std::tuple{"memory_mib", &s.memory_mib, s.memory_mib},
                                std::tuple{"vcpus", &s.vcpus, s.vcpus},
                                std::tuple{"pci_slots", &s.pci_slots, s.pci_slots}}) {
    auto v = get_uint(o, key, dflt);
    if (!v) return v.error();
    *out = *v;
  }
  for (auto [key, out] : {std::pair{"kernel", &s.kernel}, std::pair{"initrd", &s.initrd},
                          std::pair{"append", &s.append}, std::pair{"nvram", &s.nvram}}) {
    auto v = get_string(o, key, false);
    if (!v) return v.error();
    *out = *v;
  }
  for (auto [key, out] : {std::pair{"paused", &s.paused}, std::pair{"secure_boot", &s.secure_boot}}) {
    auto it = o.find(key);
    if (it == o.end()) continue;
    if (!it->value().is_bool()) return field_error(key, "must be true or false");
    *out = it->value().get_bool();
  }
  auto firmware = get_string(o, "firmware", false);
  if (!firmware) return firmware.error();
  if (*firmware == "uefi") s.firmware = Firmware::uefi;
  else if (!firmware->empty() && *firmware != "bios") return field_error("firmware", "must be bios or uefi");
  if (auto it = o.find("boot_order"); it != o.end()) {
    if (!it->value().is_array()) return field_error("boot_order", "must be a list of device ids");
    for (const auto& id : it->value().get_array()) {
      if (!id.is_string()) return field_error("boot_order", "must be a list of device ids");
      s.boot_order.emplace_back(id.get_string());
    }
  }
  if (auto ok = validate(s); !ok) return ok.error();
  return s;
}

}  // namespace broker::lifecycle
