#include "broker/domain/record_store.hpp"

#include <linux/magic.h>
#include <sys/statfs.h>

#include <boost/json/serialize.hpp>

#include "broker/core/atomic_file.hpp"
#include "broker/core/log.hpp"
#include "broker/domain/blocking.hpp"

namespace broker {
namespace {

// A domain's record describes a running QEMU and the job it is in. It must survive a crash of the
// broker, which the page cache guarantees once write() and rename() return. It need not survive
// a crash of the host (qbrokerd keeps it on /run): that ends every QEMU too, and a restarted
// broker kills and releases each uid recorded in STATE/uids (fsynced) that no record accounts
// for. So no fsync sits in a job's path.
constexpr Sync kRecordSync = Sync::process;

std::string file_of(const std::string& name) {
  return name + ".json";
}

bool on_tmpfs(const std::string& dir) {
  struct statfs st {};
  return ::statfs(dir.c_str(), &st) == 0 && (st.f_type == TMPFS_MAGIC || st.f_type == RAMFS_MAGIC);
}

}  // namespace

RecordStore::RecordStore(boost::asio::any_io_executor ex, std::string dir)
    : ex_(std::move(ex)), dir_(std::move(dir)) {
  make_dirs(dir_);
  in_memory_ = on_tmpfs(dir_);
}

RecordStore::~RecordStore() {
  writer_.join();
}

boost::asio::awaitable<Result<void>> RecordStore::persist(const Domain& d) {
  return write(d.name(), boost::json::serialize(state_to_json(d)));
}

boost::asio::awaitable<Result<void>> RecordStore::write(std::string name, std::string text) {
  const std::string file = file_of(name);
  std::error_code ec;
  if (in_memory_) {
    ec = write_file_atomic(dir_, file, text, 0600, kRecordSync);
  } else {
    ec = co_await run_blocking(ex_, writer_, [this, &file, &text] {
      return write_file_atomic(dir_, file, text, 0600, kRecordSync);
    });
  }
  if (!ec) co_return Result<void>{};
  Error e(ec, "domain " + name + ": cannot write its record");
  log::error(e.describe());
  co_return e;
}

boost::asio::awaitable<Result<void>> RecordStore::remove(std::string name) {
  const std::string file = file_of(name);
  std::error_code ec;
  if (in_memory_) {
    ec = remove_file_durable(dir_, file, kRecordSync);
  } else {
    ec = co_await run_blocking(
        ex_, writer_, [this, &file] { return remove_file_durable(dir_, file, kRecordSync); });
  }
  if (!ec) co_return Result<void>{};
  Error e(ec, "domain " + name + ": cannot remove its record");
  log::error(e.describe());
  co_return e;
}

}  // namespace broker
