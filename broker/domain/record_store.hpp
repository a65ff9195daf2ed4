// Where domain records live: one <name>.json per domain in a directory, written and removed in
// the order they were asked for. On a disk that happens on a writer thread of its own, so no job
// waits on the file system. On a tmpfs (qbrokerd keeps records beneath /run) a write and a rename
// never wait for a disk, and they are made on the caller's thread: the hop to the writer cost up
// to a millisecond of scheduling on a busy machine (bench/firmware_bench, "rest").
#pragma once

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/thread_pool.hpp>
#include <string>
#include <vector>

#include "broker/core/error.hpp"
#include "broker/domain/domain.hpp"
#include "broker/domain/state_file.hpp"

namespace broker {

class RecordStore {
 public:
  // Creates `dir` if it is missing.
  RecordStore(boost::asio::any_io_executor ex, std::string dir);
  ~RecordStore();
  RecordStore(const RecordStore&) = delete;
  RecordStore& operator=(const RecordStore&) = delete;

  // Writes the domain's record (write + rename). A failure is logged and returned.
  boost::asio::awaitable<Result<void>> persist(const Domain& d);
  // Removes the record of `name`.
  boost::asio::awaitable<Result<void>> remove(std::string name);
  // Every record in the directory (at start-up, before any job runs).
  std::vector<LoadedRecord> load() const { return load_records(dir_); }

  const std::string& dir() const { return dir_; }
  // True when the directory is on a tmpfs or ramfs, and writes are made on the caller's thread.
  bool in_memory() const { return in_memory_; }

 private:
  boost::asio::awaitable<Result<void>> write(std::string name, std::string text);

  boost::asio::any_io_executor ex_;
  std::string dir_;
  bool in_memory_ = false;
  boost::asio::thread_pool writer_{1};
};

}  // namespace broker
