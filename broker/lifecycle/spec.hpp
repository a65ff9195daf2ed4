// The validated description of a domain's QEMU (style point 1: parse, then act). Nothing here is
// opened yet; the values are checked so the command line built from them cannot be malformed and
// cannot carry a host path.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <boost/json/value.hpp>

#include "broker/core/error.hpp"

namespace broker::lifecycle {

enum class Machine { q35, none };
enum class Accel { automatic, kvm, tcg };
// How a q35 domain boots: SeaBIOS (from -kernel, or from a disk or CD) or UEFI (OVMF from a disk
// or CD, its code and a per-domain variable store passed to QEMU as pflash fds).
enum class Firmware { bios, uefi };

// A Xen domain's device model (broker/xen, docs/xen.md): QEMU serves domain `domid` through the
// hypervisor instead of running a guest of its own, under the uid libxl's convention gives it.
struct XenPart {
  std::uint32_t domid = 0;
  bool pv = false;  // a PV domain's backends (xenpv, -xen-attach); else an HVM domain (xenfv)
  unsigned uid = 0;  // base + domid, chosen by broker/xen before the start
  // Private copies of the Xen device nodes, owned by `uid`: {host node, path in the jail}.
  std::vector<std::pair<std::string, std::string>> device_nodes;
};

struct DomainSpec {
  std::string name;
  Machine machine = Machine::q35;
  Accel accel = Accel::automatic;
  std::uint32_t memory_mib = 128;
  std::uint32_t vcpus = 1;
  std::string kernel;                  // host path, opened by the broker
  std::string initrd;                  // host path, optional
  std::string append;
  std::uint32_t pci_slots = 4;         // hot-pluggable PCIe root ports
  bool paused = false;                 // stay paused after start-up
  Firmware firmware = Firmware::bios;
  bool secure_boot = false;            // UEFI with Microsoft's keys enrolled (needs SMM)
  // Disk and CD ids to boot from, in order; the firmware boots from no other device. Empty: the
  // firmware's own order over every device.
  std::vector<std::string> boot_order;
  std::string nvram;                   // UEFI variable store, a host path; empty: the broker's own
  std::optional<XenPart> xen;          // set only by the Xen mode, never parsed from a request
};

// Checks a name for a domain, disk, CD, NIC: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}. Such names go on
// QEMU's command line and into QMP ids, so they carry no comma, slash or quote.
bool valid_name(std::string_view name);

// Parses the JSON body of POST /v1/domains: {name, memory_mib, vcpus, kernel?, initrd?, append?,
// machine?, accel?, pci_slots?, paused?, firmware?, secure_boot?, boot_order?, nvram?}. Unknown fields are refused by name. Device lists
// (disks, cdroms, nics, vnc) are parsed by the layers that plug them and passed through here.
Result<DomainSpec> parse_domain_spec(const boost::json::value& body,
                                     const std::vector<std::string_view>& also_allowed = {});

// Validates a spec built in code.
Result<void> validate(const DomainSpec& spec);

std::string_view to_string(Machine m);
std::string_view to_string(Accel a);
std::string_view to_string(Firmware f);

}  // namespace broker::lifecycle
