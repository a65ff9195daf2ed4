// CD drives and their media.
//
// Drive:  [virtio-scsi controller, once per domain] -> device_add scsi-cd (no drive: empty tray).
// Insert: open read-only beneath an image root -> check it is not qcow2 -> add-fd -> close our
//         copy (FdHandover) -> blockdev-change-medium /dev/fdset/N (read-only; through host_cdrom
//         or host_device for a block device) -> tray closes (event) ->
//         remove-fd of the medium it replaced.  Undo: remove-fd.
// Eject:  eject -> tray opens (event) -> remove-fd of the old medium.
// A guest that holds the drive open has locked the tray: QEMU refuses both unless forced, and the
// caller gets errc::tray_locked (409) naming `force` — never a wait for a guest that won't answer.
#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/flows/common.hpp"
#include "broker/flows/flows.hpp"
#include "qmp/client.hpp"

namespace broker::flows {
using namespace detail;

namespace {

// QEMU 7.2: "Device 'cd0' is locked and force was not specified, wait for tray to open and try
// again". The guest was asked to open the tray; nothing changed.
Error locked_or(Error e, const std::string& id) {
  if (e.qmp_desc.find("is locked") == std::string::npos) return e;
  Error out(make_error_code(errc::tray_locked),
            "CD drive '" + id + "' is locked by the guest (a process holds it open); retry with " +
                "force to change the medium anyway");
  out.qmp_class = e.qmp_class;
  out.qmp_desc = e.qmp_desc;
  return out;
}

// Whether the tray of `id` moved to `open` among the events already received. QEMU sends
// DEVICE_TRAY_MOVED before the reply of the command that moved it, so by the time the reply is
// in, the event is queued.
bool tray_moved(qmp::EventSubscription& sub, const std::string& id, bool open) {
  auto pred = qmp::event::tray_moved(id, open);
  bool seen = false;
  while (auto ev = sub.try_next()) seen = seen || pred(*ev);
  return seen;
}

// The fdset of a medium QEMU no longer reads. QEMU closes its fd once nothing uses it.
boost::asio::awaitable<void> drop_fdset(Context& ctx, Domain& d, std::int64_t fdset) {
  if (fdset < 0) co_return;
  qmp::Command c = qmp::cmd::remove_fd(fdset);
  auto r = co_await call(ctx, d, std::move(c));
  if (!r) log::warn("leaving an fdset behind: " + r.error().describe());
}

}  // namespace

awaitable<Result<void>> add_cdrom_drive(Context& ctx, Domain& d, CdromSpec cd) {
  if (auto ok = check_new_id(d, cd.id); !ok) co_return ok.error();
  if (auto ok = co_await ensure_scsi_controller(ctx, d); !ok) co_return ok.error();
  qmp::cmd::Device dev = qmp::cmd::scsi_cd(cd.id, std::nullopt, std::string(kScsiBus));
  if (cd.bootindex) dev.props["bootindex"] = *cd.bootindex;
  qmp::Command c = qmp::cmd::device_add(dev);
  auto r = co_await call(ctx, d, std::move(c));
  if (!r) co_return r.error();
  CdromState st;
  st.id = cd.id;
  st.slot = std::string(kScsiBus);
  d.cdroms[cd.id] = std::move(st);
  co_return Result<void>{};
}

awaitable<Result<void>> insert_medium(Context& ctx, Domain& d, std::string id, InsertMedium m) {
  if (!d.cdroms.contains(id)) co_return no_such_device(d, "CD drive", id);
  auto opened = ctx.roots.open(m.path, {.access = fdpass::Access::read_only});
  if (!opened) co_return from_open(opened.error(), "path", m.path);
  auto header = read_header(opened->fd, "path");
  if (!header) co_return header.error();
  if (header->qcow2) co_return field_error("path", m.path + ": the image is qcow2; CD media are raw");
  // Tray events exist only once QEMU runs; a planned medium is in its drive from the start.
  std::optional<qmp::EventSubscription> sub;
  if (!d.cold_plan) {
    auto q = qmp_client(d);
    if (!q) co_return q.error();
    sub.emplace((*q)->subscribe());
  }

  Undo undo;
  lifecycle::FdHandover fds;
  const auto medium = fds.add_to_fdset(std::move(opened->fd), fdset_opaque(id));
  if (auto ok = co_await hand_over(ctx, d, fds); !ok) co_return ok.error();
  undo.push_all(fds.rollback());
  const std::int64_t fdset = fds.fdset(medium);

  // QEMU's `file` driver refuses a block device. A CD-ROM drive is read through `host_cdrom`; any
  // other block device (a loop device holding an ISO) through `host_device`, since host_cdrom
  // asks the drive whether a disc is in and would show the guest an empty tray.
  const fdpass::Identity& identity = opened->identity;
  const std::string protocol = identity.kind != fdpass::Identity::Kind::block ? ""
                               : identity.cdrom                               ? "host_cdrom"
                                                                              : "host_device";
  qmp::cmd::ChangeMedium change{.id = id,
                                .fdset_id = fdset,
                                .format = "raw",
                                .read_only_mode = qmp::cmd::ReadOnlyMode::read_only,
                                .protocol = protocol};
  if (m.force) change.force = true;
  qmp::Command c = qmp::cmd::blockdev_change_medium(change);
  auto r = co_await call(ctx, d, std::move(c));
  if (!r) co_return co_await undo.fail(ctx, d, locked_or(r.error(), id));
  undo.commit();
  if (sub && !tray_moved(*sub, id, false)) {
    log::warn("domain " + d.name() + ": no tray-closed event for " + id + " after the change");
  }

  auto& cd = d.cdroms[id];
  std::int64_t old = cd.fdset;
  cd.path = m.path;
  cd.identity = opened->identity;
  cd.fdset = fdset;
  co_await drop_fdset(ctx, d, old);
  co_return Result<void>{};
}

awaitable<Result<void>> eject_medium(Context& ctx, Domain& d, std::string id, bool force) {
  auto it = d.cdroms.find(id);
  if (it == d.cdroms.end()) co_return no_such_device(d, "CD drive", id);
  if (it->second.path.empty()) co_return Result<void>{};  // no medium: nothing to take out
  // The tray opens (DEVICE_TRAY_MOVED) and stays open, empty, as after a real eject.
  qmp::Command c = qmp::cmd::eject(id, force ? std::optional<bool>(true) : std::nullopt);
  auto r = co_await call(ctx, d, std::move(c));
  if (!r) co_return locked_or(r.error(), id);

  auto& cd = d.cdroms[id];
  std::int64_t old = cd.fdset;
  cd.path.clear();
  cd.identity = {};
  cd.fdset = -1;
  co_await drop_fdset(ctx, d, old);
  co_return Result<void>{};
}

}  // namespace broker::flows
