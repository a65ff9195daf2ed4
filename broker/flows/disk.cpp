// Disk hotplug and unplug.
//
// Plug:   open the image (and its backing file) beneath an image root, read-only or read-write as
//         asked, block devices checked against the caller's diskseq -> check the headers against
//         the format -> [root port | SCSI controller] -> add-fd backing, add-fd image (closing
//         our copies) -> blockdev-add backing file + format nodes -> blockdev-add file node
//         (host_device for a block device) -> blockdev-add format node (qcow2 names its backing
//         node, or null) -> device_add scsi-hd or virtio-blk-pci. Every completed step is undone in reverse if a later one fails.
// Unplug: device_del -> DEVICE_DELETED (matched on the id) within timeouts.unplug ->
//         blockdev-del format, file, backing nodes -> remove-fd -> give the root port back.
//         When the guest never lets go, nothing is taken away: the caller gets guest_timeout and
//         the disk stays attached and whole.
#include "broker/core/errc.hpp"
#include "broker/core/log.hpp"
#include "broker/flows/common.hpp"
#include "broker/flows/flows.hpp"
#include "qmp/client.hpp"

namespace broker::flows {
using namespace detail;

namespace {

// The protocol node over an fdset: a regular file, or a host block device.
qmp::Command protocol_node(const fdpass::Identity& id, std::string node, std::int64_t fdset,
                           bool read_only) {
  if (id.kind == fdpass::Identity::Kind::block) {
    return qmp::cmd::blockdev_add(qmp::cmd::HostDeviceNode{
        .node_name = std::move(node), .fdset_id = fdset, .read_only = read_only});
  }
  return qmp::cmd::blockdev_add(qmp::cmd::FileNode{
      .node_name = std::move(node), .fdset_id = fdset, .read_only = read_only});
}

Error no_slot(const Domain& d, const std::string& id) {
  return Error(make_error_code(errc::wrong_state),
               "domain " + d.name() + " has no free PCIe root port for " + id + " (all " +
                   std::to_string(d.spec().pci_slots) + " in use)");
}

// blockdev-del that counts a node already gone as deleted (a retry after a partial unplug).
awaitable<Result<void>> del_node(Context& ctx, Domain& d, std::string node) {
  qmp::Command c = qmp::cmd::blockdev_del(node);
  auto r = co_await call(ctx, d, std::move(c));
  if (!r && r.error().qmp_desc.find("Failed to find node") == std::string::npos) co_return r.error();
  co_return Result<void>{};
}

}  // namespace

awaitable<Result<void>> add_disk(Context& ctx, Domain& d, DiskSpec disk) {
  if (auto ok = check_new_id(d, disk.id); !ok) co_return ok.error();
  const std::string& id = disk.id;

  // Open and check everything before QEMU is touched: a refusal leaves nothing behind.
  fdpass::OpenOptions how{.access = disk.read_only ? fdpass::Access::read_only
                                                   : fdpass::Access::read_write,
                          .expect_diskseq = disk.diskseq};
  auto image = ctx.roots.open(disk.path, how);
  if (!image) co_return from_open(image.error(), "path", disk.path);
  auto header = read_header(image->fd, "path");
  if (!header) co_return header.error();
  if (auto ok = check_format(*header, disk.format, !disk.backing.empty()); !ok) co_return ok.error();
  std::optional<fdpass::Opened> backing;
  ImageHeader backing_header;
  if (!disk.backing.empty()) {
    auto b = ctx.roots.open(disk.backing, {.access = fdpass::Access::read_only});
    if (!b) co_return from_open(b.error(), "backing", disk.backing);
    auto bh = read_header(b->fd, "backing");
    if (!bh) co_return bh.error();
    if (bh->backing_file || bh->external_data) {
      co_return field_error("backing", disk.backing +
                                           ": the backing image refers to further files; only one "
                                           "level of backing file is supported");
    }
    if (b->identity.same_object(image->identity)) {
      co_return field_error("backing", "the backing file is the image itself");
    }
    backing_header = *bh;
    backing = std::move(*b);
  }

  Undo undo;
  std::string slot;
  if (disk.bus == DiskBus::virtio) {
    auto s = d.allocate_slot(id);
    if (!s) co_return no_slot(d, id);
    slot = *s;
    undo.push_slot(slot);
  } else {
    if (auto ok = co_await ensure_scsi_controller(ctx, d); !ok) co_return ok.error();
    slot = std::string(kScsiBus);
  }

  // The fds: QEMU keeps them in fdsets, we close our copies at once.
  std::int64_t backing_fdset = -1;
  if (backing) {
    std::string opaque = fdset_opaque(id + "-backing");
    auto set = co_await add_fd(ctx, d, backing->fd, std::move(opaque));
    if (!set) co_return co_await undo.fail(ctx, d, set.error());
    backing->fd.reset();
    undo.push(qmp::cmd::remove_fd(*set));
    backing_fdset = *set;
  }
  std::string opaque = fdset_opaque(id);
  auto fdset = co_await add_fd(ctx, d, image->fd, std::move(opaque));
  if (!fdset) co_return co_await undo.fail(ctx, d, fdset.error());
  image->fd.reset();
  undo.push(qmp::cmd::remove_fd(*fdset));

  // The node graph, bottom up. The backing chain is given explicitly, so QEMU never follows the
  // backing file name written in the image header.
  std::optional<std::string> backing_ref;
  if (backing) {
    qmp::Command c = protocol_node(backing->identity, backing_file_node(id), backing_fdset, true);
    auto r = co_await call(ctx, d, std::move(c));
    if (!r) co_return co_await undo.fail(ctx, d, r.error());
    undo.push(qmp::cmd::blockdev_del(backing_file_node(id)));
    qmp::Command fmt = backing_header.qcow2
                           ? qmp::cmd::blockdev_add(qmp::cmd::Qcow2Node{
                                 .node_name = backing_node(id),
                                 .file = backing_file_node(id),
                                 .backing = std::nullopt,
                                 .read_only = true})
                           : qmp::cmd::blockdev_add(qmp::cmd::RawNode{
                                 .node_name = backing_node(id),
                                 .file = backing_file_node(id),
                                 .read_only = true});
    r = co_await call(ctx, d, std::move(fmt));
    if (!r) co_return co_await undo.fail(ctx, d, r.error());
    undo.push(qmp::cmd::blockdev_del(backing_node(id)));
    backing_ref = backing_node(id);
  }
  qmp::Command add_file = protocol_node(image->identity, file_node(id), *fdset, disk.read_only);
  auto r = co_await call(ctx, d, std::move(add_file));
  if (!r) co_return co_await undo.fail(ctx, d, r.error());
  undo.push(qmp::cmd::blockdev_del(file_node(id)));
  qmp::Command fmt = disk.format == DiskFormat::qcow2
                         ? qmp::cmd::blockdev_add(qmp::cmd::Qcow2Node{.node_name = format_node(id),
                                                                      .file = file_node(id),
                                                                      .backing = backing_ref,
                                                                      .read_only = disk.read_only})
                         : qmp::cmd::blockdev_add(qmp::cmd::RawNode{.node_name = format_node(id),
                                                                    .file = file_node(id),
                                                                    .read_only = disk.read_only});
  r = co_await call(ctx, d, std::move(fmt));
  if (!r) co_return co_await undo.fail(ctx, d, r.error());
  undo.push(qmp::cmd::blockdev_del(format_node(id)));

  qmp::cmd::Device dev = disk.bus == DiskBus::virtio
                             ? qmp::cmd::virtio_blk_pci(id, format_node(id), slot)
                             : qmp::cmd::scsi_hd(id, format_node(id), slot);
  // A qdev property of both devices; the builders have no parameter for it.
  if (!disk.serial.empty()) dev.props["serial"] = disk.serial;
  qmp::Command add_dev = qmp::cmd::device_add(dev);
  r = co_await call(ctx, d, std::move(add_dev));
  if (!r) co_return co_await undo.fail(ctx, d, r.error());
  undo.commit();

  DiskState st;
  st.spec = std::move(disk);
  st.identity = image->identity;
  st.fdset = *fdset;
  st.backing_fdset = backing_fdset;
  st.slot = slot;
  std::string key = st.spec.id;
  d.disks[key] = std::move(st);
  co_return Result<void>{};
}

awaitable<Result<void>> remove_disk(Context& ctx, Domain& d, std::string id, ProgressFn progress) {
  auto it = d.disks.find(id);
  if (it == d.disks.end()) co_return no_such_device(d, "disk", id);
  const DiskState st = it->second;
  std::string what = "disk " + id;
  auto gone = co_await unplug(ctx, d, id, std::move(what), std::move(progress));
  if (!gone) co_return gone.error();

  // The guest has let go. A failure from here on keeps the disk listed, so a retry (device_del
  // then finds no device) finishes the removal.
  std::vector<std::string> nodes = {format_node(id), file_node(id)};
  if (!st.spec.backing.empty()) {
    nodes.push_back(backing_node(id));
    nodes.push_back(backing_file_node(id));
  }
  for (auto& node : nodes) {
    auto r = co_await del_node(ctx, d, node);
    if (!r) co_return r.error();
  }
  for (std::int64_t set : {st.fdset, st.backing_fdset}) {
    if (set < 0) continue;
    qmp::Command c = qmp::cmd::remove_fd(set);
    auto r = co_await call(ctx, d, std::move(c));
    if (!r) log::warn("leaving an fdset behind: " + r.error().describe());
  }
  if (st.spec.bus == DiskBus::virtio) d.free_slot(st.slot);
  d.disks.erase(id);
  co_return Result<void>{};
}

}  // namespace broker::flows
