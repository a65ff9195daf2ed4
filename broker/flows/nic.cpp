// NIC hotplug and unplug.
//
// Plug:   root port -> open (or create) the tap in the broker's, i.e. the host's, network
//         namespace -> getfd qb-tap-<id> (closing our copy) -> netdev_add tap fd=qb-tap-<id>
//         (QEMU takes the named fd) -> device_add virtio-net-pci (romfile "": no ROM files in
//         the jail). Every completed step is undone in reverse if a later one fails.
// Unplug: device_del -> DEVICE_DELETED within timeouts.unplug -> netdev_del (QEMU closes the tap;
//         a tap the broker created vanishes with it) -> give the root port back.
#include "broker/core/errc.hpp"
#include "broker/flows/common.hpp"
#include "broker/flows/flows.hpp"
#include "fdpass/devices.hpp"
#include "qmp/client.hpp"

namespace broker::flows {
using namespace detail;

awaitable<Result<void>> add_nic(Context& ctx, Domain& d, NicSpec nic) {
  if (auto ok = check_new_id(d, nic.id); !ok) co_return ok.error();
  const std::string id = nic.id;
  auto slot = d.allocate_slot(id);
  if (!slot) co_return slot.error();
  Undo undo;
  undo.push_slot(*slot);
  auto tap = fdpass::open_tap(nic.tap);
  if (!tap) {
    co_return co_await undo.fail(
        ctx, d,
        field_error("tap", "cannot open tap '" + nic.tap + "': " + tap.error().message()));
  }

  // QEMU holds the tap once it is handed over; it lives as long as QEMU's fd does.
  const std::string fdname = tap_fd_name(id);
  lifecycle::FdHandover fds;
  fds.add_named(std::move(tap->fd), fdname);
  if (auto ok = co_await hand_over(ctx, d, fds); !ok) co_return co_await undo.fail(ctx, d, ok.error());
  undo.push_all(fds.rollback());

  const std::string netdev = netdev_id(id);
  qmp::Command add_netdev = qmp::cmd::netdev_add_tap(netdev, fdname);
  auto r = co_await call(ctx, d, std::move(add_netdev));
  if (!r) co_return co_await undo.fail(ctx, d, r.error());
  undo.pop();  // the netdev took the named fd
  undo.push(qmp::cmd::netdev_del(netdev_id(id)));

  std::optional<std::string> mac;
  if (!nic.mac.empty()) mac = nic.mac;
  const qmp::cmd::Device dev = qmp::cmd::virtio_net_pci(id, netdev, mac, *slot);
  qmp::Command add_dev = qmp::cmd::device_add(dev);
  r = co_await call(ctx, d, std::move(add_dev));
  if (!r) co_return co_await undo.fail(ctx, d, r.error());
  undo.commit();

  NicState st;
  st.spec = std::move(nic);
  st.tap = tap->name;
  st.slot = *slot;
  d.nics[id] = std::move(st);
  co_return Result<void>{};
}

awaitable<Result<void>> remove_nic(Context& ctx, Domain& d, std::string id, ProgressFn progress) {
  auto it = d.nics.find(id);
  if (it == d.nics.end()) co_return no_such_device(d, "NIC", id);
  const std::string slot = it->second.slot;
  std::string what = "NIC " + id;
  auto gone = co_await unplug(ctx, d, id, std::move(what), std::move(progress));
  if (!gone) co_return gone.error();
  const std::string netdev = netdev_id(id);
  qmp::Command del = qmp::cmd::netdev_del(netdev);
  auto r = co_await call(ctx, d, std::move(del));
  // DeviceNotFound: a retry after an earlier netdev_del went through.
  if (!r && r.error().qmp_class != "DeviceNotFound") co_return r.error();
  d.free_slot(slot);
  d.nics.erase(id);
  co_return Result<void>{};
}

}  // namespace broker::flows
