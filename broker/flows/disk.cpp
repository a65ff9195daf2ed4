// Disk hotplug and unplug.
//
// Plug:   open the image (and its backing file) beneath an image root, read-only or read-write as
//         asked, block devices checked against the caller's diskseq -> check the headers against
//         the format -> [root port | SCSI controller] -> add-fd backing, add-fd image (one
//         FdHandover; our copies closed) -> blockdev-add backing file + format nodes ->
//         blockdev-add file node (host_device for a block device) -> blockdev-add format node
//         (qcow2 names its backing node, or null) -> device_add scsi-hd or virtio-blk-pci. Every
//         completed step is undone in reverse if a later one fails.
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

// What add_disk opened, checked before QEMU is touched.
struct DiskImages {
  fdpass::Opened image;
  ImageHeader header;
  std::optional<fdpass::Opened> backing;
  ImageHeader backing_header;
};

// Opens the image (and its backing file) with the broker's credentials and checks their headers
// against what the caller said: a refusal here leaves nothing behind.
Result<DiskImages> open_images(Context& ctx, const DiskSpec& disk) {
  fdpass::OpenOptions how{.access = disk.read_only ? fdpass::Access::read_only
                                                   : fdpass::Access::read_write,
                          .expect_diskseq = disk.diskseq};
  auto image = ctx.roots.open(disk.path, how);
  if (!image) return from_open(image.error(), "path", disk.path);
  auto header = read_header(image->fd, "path");
  if (!header) return header.error();
  if (auto ok = check_format(*header, disk.format, !disk.backing.empty()); !ok) return ok.error();
  DiskImages out{std::move(*image), *header, std::nullopt, {}};
  if (disk.backing.empty()) return out;
  auto b = ctx.roots.open(disk.backing, {.access = fdpass::Access::read_only});
  if (!b) return from_open(b.error(), "backing", disk.backing);
  auto bh = read_header(b->fd, "backing");
  if (!bh) return bh.error();
  if (bh->backing_file || bh->external_data) {
    return field_error("backing", disk.backing +
                                      ": the backing image refers to further files; only one "
                                      "level of backing file is supported");
  }
  if (b->identity.same_object(out.image.identity)) {
    return field_error("backing", "the backing file is the image itself");
  }
  out.backing_header = *bh;
  out.backing = std::move(*b);
  return out;
}

// Where the disk plugs in: a root port of its own (virtio) or the SCSI controller's bus.
awaitable<Result<std::string>> take_slot(Context& ctx, Domain& d, const DiskSpec& disk, Undo& undo) {
  if (disk.bus == DiskBus::scsi) {
    if (auto ok = co_await ensure_scsi_controller(ctx, d); !ok) co_return ok.error();
    co_return std::string(kScsiBus);
  }
  auto slot = d.allocate_slot(disk.id);
  if (!slot) co_return slot.error();
  undo.push_slot(*slot);
  co_return *slot;
}

// blockdev-add of `c`, pushing `node`'s blockdev-del onto `undo`.
awaitable<Result<void>> add_node(Context& ctx, Domain& d, qmp::Command c, std::string node,
                                 Undo& undo) {
  auto r = co_await call(ctx, d, std::move(c));
  if (!r) co_return r.error();
  undo.push(qmp::cmd::blockdev_del(std::move(node)));
  co_return Result<void>{};
}

// A format node (qcow2 or raw) called `node` over the protocol node `file`.
qmp::Command format_node_cmd(bool qcow2, std::string node, std::string file,
                             std::optional<std::string> backing, bool read_only) {
  if (qcow2) {
    return qmp::cmd::blockdev_add(qmp::cmd::Qcow2Node{
        .node_name = std::move(node), .file = std::move(file), .backing = std::move(backing),
        .read_only = read_only});
  }
  return qmp::cmd::blockdev_add(
      qmp::cmd::RawNode{.node_name = std::move(node), .file = std::move(file), .read_only = read_only});
}

// The node graph, bottom up: backing file and format nodes, then the image's file and format
// nodes. The backing chain is given explicitly, so QEMU never follows the backing file name
// written in the image header.
awaitable<Result<void>> add_nodes(Context& ctx, Domain& d, const DiskSpec& disk,
                                  const DiskImages& images, const lifecycle::FdHandover& fds,
                                  Undo& undo) {
  const std::string& id = disk.id;
  std::optional<std::string> backing_ref;
  if (images.backing) {
    qmp::Command file = protocol_node(images.backing->identity, backing_file_node(id), fds.fdset(0), true);
    if (auto ok = co_await add_node(ctx, d, std::move(file), backing_file_node(id), undo); !ok) co_return ok;
    qmp::Command fmt = format_node_cmd(images.backing_header.qcow2, backing_node(id),
                                       backing_file_node(id), std::nullopt, true);
    if (auto ok = co_await add_node(ctx, d, std::move(fmt), backing_node(id), undo); !ok) co_return ok;
    backing_ref = backing_node(id);
  }
  const std::int64_t image_set = fds.fdset(fds.entries().size() - 1);
  qmp::Command file = protocol_node(images.image.identity, file_node(id), image_set, disk.read_only);
  if (auto ok = co_await add_node(ctx, d, std::move(file), file_node(id), undo); !ok) co_return ok;
  qmp::Command fmt = format_node_cmd(disk.format == DiskFormat::qcow2, format_node(id), file_node(id),
                                     backing_ref, disk.read_only);
  co_return co_await add_node(ctx, d, std::move(fmt), format_node(id), undo);
}

}  // namespace

awaitable<Result<void>> add_disk(Context& ctx, Domain& d, DiskSpec disk) {
  if (auto ok = check_new_id(d, disk.id); !ok) co_return ok.error();
  const std::string id = disk.id;
  auto images = open_images(ctx, disk);
  if (!images) co_return images.error();

  Undo undo;
  auto slot = co_await take_slot(ctx, d, disk, undo);
  if (!slot) co_return co_await undo.fail(ctx, d, slot.error());

  // The fds go into fdsets, backing file first; QEMU keeps them and our copies are closed.
  lifecycle::FdHandover fds;
  if (images->backing) fds.add_to_fdset(std::move(images->backing->fd), fdset_opaque(id + "-backing"));
  fds.add_to_fdset(std::move(images->image.fd), fdset_opaque(id));
  if (auto ok = co_await hand_over(ctx, d, fds); !ok) co_return co_await undo.fail(ctx, d, ok.error());
  undo.push_all(fds.rollback());

  if (auto ok = co_await add_nodes(ctx, d, disk, *images, fds, undo); !ok) {
    co_return co_await undo.fail(ctx, d, ok.error());
  }
  qmp::cmd::Device dev = disk.bus == DiskBus::virtio
                             ? qmp::cmd::virtio_blk_pci(id, format_node(id), *slot)
                             : qmp::cmd::scsi_hd(id, format_node(id), *slot);
  // A qdev property of both devices; the builders have no parameter for it.
  if (!disk.serial.empty()) dev.props["serial"] = disk.serial;
  if (disk.bootindex) dev.props["bootindex"] = *disk.bootindex;
  qmp::Command add_dev = qmp::cmd::device_add(dev);
  if (auto r = co_await call(ctx, d, std::move(add_dev)); !r) co_return co_await undo.fail(ctx, d, r.error());
  undo.commit();

  DiskState st;
  st.spec = std::move(disk);
  st.identity = images->image.identity;
  st.fdset = fds.fdset(fds.entries().size() - 1);
  st.backing_fdset = images->backing ? fds.fdset(0) : -1;
  st.slot = *slot;
  d.disks[id] = std::move(st);
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
    auto r = co_await delete_node(ctx, d, node);
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
