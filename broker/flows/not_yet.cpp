// Flows whose implementation has not landed answer not_implemented (HTTP 501) rather than
// pretending to work.
#include "broker/core/errc.hpp"
#include "broker/flows/flows.hpp"

namespace broker::flows {
namespace {
Error not_yet(std::string_view what) {
  return Error(make_error_code(errc::not_implemented), std::string(what) + " is not implemented yet");
}
}  // namespace

awaitable<Result<void>> add_cdrom_drive(Context&, Domain&, CdromSpec) { co_return not_yet("CD drives"); }
awaitable<Result<void>> insert_medium(Context&, Domain&, std::string, InsertMedium) {
  co_return not_yet("CD insert");
}
awaitable<Result<void>> eject_medium(Context&, Domain&, std::string, bool) { co_return not_yet("CD eject"); }
awaitable<Result<void>> add_disk(Context&, Domain&, DiskSpec) { co_return not_yet("disk hotplug"); }
awaitable<Result<void>> remove_disk(Context&, Domain&, std::string, ProgressFn) {
  co_return not_yet("disk unplug");
}
awaitable<Result<void>> add_nic(Context&, Domain&, NicSpec) { co_return not_yet("NIC hotplug"); }
awaitable<Result<void>> remove_nic(Context&, Domain&, std::string, ProgressFn) {
  co_return not_yet("NIC unplug");
}
awaitable<Result<VncState>> set_vnc(Context&, Domain&, VncSpec) { co_return not_yet("VNC"); }
awaitable<Result<void>> remove_vnc(Context&, Domain&) { co_return not_yet("VNC"); }

}  // namespace broker::flows
