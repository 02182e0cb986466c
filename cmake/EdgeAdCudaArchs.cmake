# edge_ad_cuda_archs(VERSION PROCESSOR OUT): the default CUDA architectures of the preprocessing
# kernel for nvcc VERSION building on PROCESSOR (aarch64 = Jetson). Used by CMakeLists.txt when
# CMAKE_CUDA_ARCHITECTURES is not given; tests/test_cuda_build.py runs it in script mode:
#   cmake -DVERSION=13.0 -DPROCESSOR=aarch64 -P cmake/EdgeAdCudaArchs.cmake   (prints the list)
function(edge_ad_cuda_archs version processor out)
  if(processor MATCHES "aarch64|arm64")
    if(version VERSION_GREATER_EQUAL 13.0)
      set(archs "87;110")          # Orin; Thor (sm_110 from CUDA 13)
    elseif(version VERSION_GREATER_EQUAL 11.4)
      set(archs "72;87")           # Xavier; Orin
    else()
      set(archs "72")              # Xavier (JetPack 4 / 5.0)
    endif()
  else()
    if(version VERSION_GREATER_EQUAL 12.8)
      set(archs "75-real;80-real;86-real;89-real;90-real;100-real;120")  # Turing..Blackwell + PTX
    elseif(version VERSION_GREATER_EQUAL 11.8)
      set(archs "75-real;80-real;86-real;89-real;90")
    elseif(version VERSION_GREATER_EQUAL 11.1)
      set(archs "75-real;80-real;86")
    else()
      set(archs "75")
    endif()
  endif()
  set(${out} "${archs}" PARENT_SCOPE)
endfunction()


if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  edge_ad_cuda_archs("${VERSION}" "${PROCESSOR}" archs)
  message("${archs}")
endif()
